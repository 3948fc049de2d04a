"""The command line: the app, its options, input resolution, and one module per command body."""
