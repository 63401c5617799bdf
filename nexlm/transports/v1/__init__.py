"""``/v1``: OpenAI's API for programs (the openai package, Open WebUI, CLIs), stateless."""
