"""daad-agent: the on-site service that scores camera frames and publishes defects over MQTT."""
