"""What operators do, for the CLI and the web console: the connector registry, replay /
cancel / send-now and the other message operations, and the reports they read.
"""
