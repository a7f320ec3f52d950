"""One module per command family; each defines `register(tree: CommandTree)`."""
