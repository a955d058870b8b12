"""Role names of the chat formats we read -> chat-template roles. Torch-free: the preprocessors import it too."""

# ShareGPT's human/gpt, OpenAssistant's prompter, WildChat's and others' spellings.
ROLE_ALIASES = {"user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "chatgpt": "assistant", "system": "system"}
