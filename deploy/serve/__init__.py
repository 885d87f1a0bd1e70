"""`dgpt serve`: an OpenAI-compatible HTTP API over a saved model folder, and a browser chat page
that is one more client of that API (see README.md in this folder).

settings.py: the typed server settings; protocol.py: request bodies and OpenAI error objects;
jobs.py: a request's sampler settings, canvas and limits; batching.py: the batch collector and
decode worker; metrics.py: Prometheus metrics; app.py: the FastAPI routes; cli.py: the `dgpt
serve` sub-command; static/: the chat page; browser_check.py: the page in headless Chromium.
"""
