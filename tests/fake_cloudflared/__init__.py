"""The cloudflared stand-in (fake_cloudflared.py) and the helpers tests use to run it."""
