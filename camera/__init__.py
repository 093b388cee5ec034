"""Cameras for the agent and calibration: sources (camera.sources), the capture loop that keeps one alive
(camera.loop) and the `camera` section of agent.yaml (camera.config). Imports engine/ only."""
