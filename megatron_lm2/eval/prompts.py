"""BABILong's prompts for qa1-qa10: the benchmark's published protocol (booydar/babilong,
babilong/prompts.py, Apache-2.0), kept character for character because the instruction,
the in-context examples and the post-prompt are part of what the scores measure (typos and
the stray '<context>' at the end of qa10's examples included).

    build_prompt(task, context, question)  ->  the model input
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE = "{instruction}\n{examples}\n{post_prompt}\n<context>\n{context}\n</context>\nQuestion: {question}"


@dataclass(frozen=True)
class TaskPrompt:
    instruction: str
    examples: str
    post_prompt: str


def _examples(*blocks: str, sep: str = "\n", tail: str = "") -> str:
    return sep.join(f"<example>\n{block}\n</example>" for block in blocks) + tail


_FACTS_RULE = (
    "If a person got an item in the first location and travelled to the second location "
    "the item is also in the second location. "
    "If a person dropped an item in the first location and moved to the second location "
    "the item remains in the first location"
)
_LATEST = (
    "I will give you context with the facts about people and their locations hidden in some random text and "
    "a question. You need to answer the question based only on the information from the facts. "
    "If a person was in different locations, use the latest location the person was in to answer the question."
)
_CARRY = (
    "I will give you context with the facts about people and objects they carry, hidden in some random text "
    "and a question. You need to answer the question based only on the information from the facts."
)

PROMPTS: dict[str, TaskPrompt] = {
    "qa1": TaskPrompt(
        instruction=(
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question."
        ),
        examples=_examples(
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
            "Where is Charlie?\nAnswer: The most recent location of Charlie is balcony.",
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\nAnswer: The most recent location of Alan is shop.",
            sep="\n\n",
        ),
        post_prompt=(
            "Always return your answer in the following format: "
            "The most recent location of \u2019person\u2019 is \u2019location\u2019. Do not write anything else after that. "
        ),
    ),
    "qa2": TaskPrompt(
        instruction=(
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question."
            "You need to answer the question based only on the information from the facts.\n"
            + _FACTS_RULE
            + "."
        ),
        examples=_examples(
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\nAnswer: The bottle is in the balcony.",
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\nAnswer: The screw driver is in the kitchen.",
        ),
        post_prompt=(
            "Always return your answer in the following format: The \u2019item\u2019 is in \u2019location\u2019. "
            "Do not write anything else after that."
        ),
    ),
    "qa3": TaskPrompt(
        instruction=(
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. "
            "You need to answer the question based only on the information from the facts.\n" + _FACTS_RULE
        ),
        examples=_examples(
            "John journeyed to the bedroom.Mary grabbed the apple. Mary went back to the bathroom. "
            "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. "
            "Where was the apple before the kitchen?\nAnswer: Before the kitchen the apple was in the bathroom.",
            "John went back to the bedroom. John went back to the garden. John went back to the kitchen. "
            "Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. "
            "Where was the football before the bedroom?\nAnswer: Before the kitchen the football was in the garden.",
        ),
        post_prompt=(
            "Always return your answer in the following format: "
            "Before the $location_1& the $item$ was in the $location_2$. Do not write anything else after that."
        ),
    ),
    "qa4": TaskPrompt(
        instruction=(
            "I will give you context with the facts about different people, their location and actions, hidden in "
            "some random text and a question. "
            "You need to answer the question based only on the information from the facts."
        ),
        examples=_examples(
            "The hallway is south of the kitchen. The bedroom is north of the kitchen. "
            "What is the kitchen south of?\nAnswer: bedroom",
            "The garden is west of the bedroom. The bedroom is west of the kitchen. What is west of the bedroom?\n"
            "Answer: garden",
        ),
        post_prompt="Your answer should contain only one word - location. Do not write anything else after that.",
    ),
    "qa5": TaskPrompt(
        instruction=(
            "I will give you context with the facts about locations and their relations hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts."
        ),
        examples=_examples(
            "Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. "
            "Bill took the milk there. Who did Mary give the apple to?\nAnswer: Fred",
            "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. "
            "Bill travelled to the bedroom. Who gave the football?\nAnswer: Jeff",
            "Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. "
            "Jeff went back to the garden. What did Fred give to Bill?\nAnswer: apple",
        ),
        post_prompt=(
            "Your answer should contain only one word. Do not write anything else after that. "
            "Do not explain your answer."
        ),
    ),
    "qa6": TaskPrompt(
        instruction=_LATEST,
        examples=_examples(
            "John travelled to the hallway. John travelled to the garden. Is John in the garden?\nAnswer: yes",
            "Mary went to the office. Daniel journeyed to the hallway. Mary went to the bedroom. "
            "Sandra went to the garden. Is Mary in the office?\nAnswer: no",
            tail="\n",
        ),
        post_prompt=(
            "Your answer should contain only one word - $yes$ or $no$. Do not write anything else after that. "
            "Do not explain your answer."
        ),
    ),
    "qa7": TaskPrompt(
        instruction=_CARRY,
        examples=_examples(
            "Daniel went to the bedroom. Daniel got the apple there. How many objects is Daniel carrying?\n"
            "Answer: one",
            "Mary grabbed the apple there. Mary gave the apple to John. How many objects is Mary carrying?\n"
            "Answer: none",
            "Sandra travelled to the hallway. Sandra picked up the milk there. Sandra took the apple there. "
            "Mary travelled to the garden. How many objects is Sandra carrying?\nAnswer: two",
            tail="\n",
        ),
        post_prompt=(
            "Your answer should contain only one word - $none$ or $number_of_objects$. "
            "Do not write anything else after that. Do not explain your answer."
        ),
    ),
    "qa8": TaskPrompt(
        instruction=_CARRY,
        examples=_examples(
            "Sandra travelled to the garden. Mary grabbed the milk there. What is Mary carrying?\nAnswer: milk",
            "Mary travelled to the kitchen. Sandra travelled to the office. John travelled to the office. "
            "Sandra discarded the milk there. What is Sandra carrying?\nAnswer: nothing",
            "Daniel grabbed the apple there. Mary went to the office. Daniel moved to the garden. "
            "Daniel grabbed the milk there. Mary went to the kitchen. What is Daniel carrying?\n"
            "Answer: apple,milk",
            tail="\n",
        ),
        post_prompt=(
            "Your answer should contain only one or two words: $nothing$ or $object$ or $object_1$, $object_2$. "
            "Do not write anything else. Do not explain your answer."
        ),
    ),
    "qa9": TaskPrompt(
        instruction=_LATEST,
        examples=_examples(
            "John is not in the bathroom. Sandra is not in the bedroom. Is John in the bathroom?\nAnswer: no",
            "Mary journeyed to the kitchen. John is in the bedroom. Sandra is not in the garden. "
            "Is Mary in the kitchen?\nAnswer: yes",
            tail="\n",
        ),
        post_prompt=(
            "Your answer should contain only one word - $yes$ or $no$. Do not write anything else. "
            "Do not explain your answer."
        ),
    ),
    "qa10": TaskPrompt(
        instruction=_LATEST,
        examples=_examples(
            "Bill is in the kitchen. Julie is either in the school or the cinema. Is Bill in the bedroom?\n"
            "Answer: no",
            "Fred is in the bedroom. Mary is either in the school or the cinema. Is Mary in the school?\n"
            "Answer: maybe",
            "Fred is either in the kitchen or the park. Bill moved to the cinema. Is Bill in the cinema?\n"
            "Answer: yes",
            tail="\n<context>\n",
        ),
        post_prompt=(
            "Your answer should contain only one word - $yes$ or $no$ or $maybe$. Do not write anything else. "
            "Do not explain your answer."
        ),
    ),
}


def build_prompt(task: str, context: str, question: str, use_instruction: bool = True,
                 use_examples: bool = True, use_post_prompt: bool = True) -> str:
    """The benchmark's input for one sample (its default: all three prompt parts on)."""
    if task not in PROMPTS:
        raise KeyError(f"no BABILong prompt for task {task!r}; known: {', '.join(PROMPTS)}")
    p = PROMPTS[task]
    return TEMPLATE.format(
        instruction=p.instruction if use_instruction else "",
        examples=p.examples if use_examples else "",
        post_prompt=p.post_prompt if use_post_prompt else "",
        context=context,
        question=question,
    ).strip()
