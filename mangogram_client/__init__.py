"""The MangoGram console client: `python client.py`."""
