"""The `switchyard` command line: `switchyard up`, its supervisor, clients and config rendering."""
