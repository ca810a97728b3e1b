"""Commands that reach the Hub: push."""
