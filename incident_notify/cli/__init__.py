"""The command line: thin Typer commands that call one core function and render its result."""
