"""foobar_app: the aiohttp app servers behind foobar_lb (filled by a later issue)."""
