"""`unlearn` subcommands that drive the engine directly (no service needed)."""
