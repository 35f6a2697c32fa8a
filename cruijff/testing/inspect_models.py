"""A scripted Inspect model provider (a test double, offline and deterministic):
`cruijff-scripted/capitalizer` answers "Capitalize: <word>" with the word in capitals only
when its system prompt asks for CAPITALS; otherwise it repeats the word unchanged. Prompt
optimization tests use it to check that the right instruction is found."""

from __future__ import annotations

from typing import Any

from inspect_ai.model import (
    ChatMessage,
    ChatMessageSystem,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    modelapi,
)


@modelapi(name="cruijff-scripted")
class ScriptedCapitalizer(ModelAPI):
    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig | None = None, **model_args: Any) -> None:
        super().__init__(model_name, base_url, api_key, [], config or GenerateConfig())

    async def generate(self, input: list[ChatMessage], tools: list, tool_choice: Any,
                       config: GenerateConfig) -> ModelOutput:
        system = " ".join(m.text for m in input if isinstance(m, ChatMessageSystem))
        word = input[-1].text.rsplit(":", 1)[-1].strip()
        answer = word.upper() if "CAPITALS" in system else word
        return ModelOutput.from_content(model=self.model_name, content=answer)
