"""Deployment: Hub publishing (model_card.py, publish.py, publish_cli.py; its typed settings are
dgpt_core/config/publish.py) and the Prefect server, worker and deployment scripts (prefect/)."""
