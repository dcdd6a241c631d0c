"""One router per concern: chat completions, models, conversations, operations, the web page."""
