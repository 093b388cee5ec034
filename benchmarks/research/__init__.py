"""Research probes behind the product's defaults; each module's docstring names the note in docs/research/."""
