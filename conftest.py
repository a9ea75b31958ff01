# stackcheck's pytest plugin: options, fixtures and results for the cases.
pytest_plugins = ["fixtures.plugin"]
