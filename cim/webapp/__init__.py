"""The web chat app's files and the site that serves them (``[web]``)."""
