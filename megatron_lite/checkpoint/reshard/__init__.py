"""Moving state between parallel layouts through the global tensor index."""
