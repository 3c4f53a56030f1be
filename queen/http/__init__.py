"""The HTTP side on --http-listen: the OpenAI-compatible API and the operator dashboard as one
app, with the sending and errors they share."""
