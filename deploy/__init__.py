"""Deployment: Hub publishing (config.py, model_card.py, publish.py, publish_cli.py) and the
DeepSpeed JSON configs (deepspeed/)."""
