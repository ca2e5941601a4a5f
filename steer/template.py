"""The plain instruction template steer uses wherever a prompt meets a model.

Gemma 3 270M is a base model without a chat template.  Trainers (SFT, DPO, reward models) and reward
potentials all format prompts with this one template, so a reward model scores text laid out exactly
as it saw it in training.
"""

from __future__ import annotations

TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n"


def format_prompt(instruction: str) -> str:
    """The instruction template: what a model sees before its response."""
    return TEMPLATE.format(instruction=instruction.strip())


def instruction_of(prompt: str) -> str:
    """The instruction inside a prompt laid out by `format_prompt` (files store instructions, so that
    reading them back templates them once)."""
    head, tail = TEMPLATE.split("{instruction}")
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        raise ValueError("not a prompt in steer's instruction template")
    return prompt[len(head):len(prompt) - len(tail)]


# The additive 5-point LLM-as-a-Judge prompt of Self-Rewarding Language Models (Yuan et al. 2024,
# arXiv 2401.10020, figure 2).
JUDGE_PROMPT = """Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {instruction}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria."""


def judge_instruction(instruction: str, response: str) -> str:
    """The judge prompt for one (instruction, response)."""
    return JUDGE_PROMPT.format(instruction=instruction.strip(), response=response.strip())
