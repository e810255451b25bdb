"""Prompts from the checkpoint's chat template when it has one, else the family's default (issue 21 item 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightkv_cli.engine.prepare import prepare_inputs
from lightkv_cli.errors import UserError
from lightkv_cli.inputs import PromptItem
from lightkv_cli.inputs.images import load_image_input
from lightkv_cli.models.prompting import CHAT_TEMPLATE, FAMILY_DEFAULT, build_prompt, chat_template_owner

#: A Vicuna-like template over content lists (image entries become the family's placeholder).
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}SYS: {{ m['content'][0]['text'] }}\n"
    "{% else %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture
def templated(tiny):
    proc = copy.copy(tiny.processor)
    proc.chat_template = TEMPLATE
    return proc


def test_no_template_falls_back_to_the_family_default(tiny):
    assert chat_template_owner(tiny.processor) is None
    built = build_prompt(tiny.processor, tiny.adapter, "What is this?")
    assert built == build_prompt(tiny.processor, tiny.adapter, "What is this?", system=None)
    assert built.source == FAMILY_DEFAULT and built.text == tiny.adapter.format_prompt("What is this?")
    with_system = build_prompt(tiny.processor, tiny.adapter, "What is this?", system="Be brief.")
    assert with_system.text == "Be brief.\n" + built.text


def test_the_checkpoint_template_is_used_with_its_system_message(tiny, templated):
    built = build_prompt(templated, tiny.adapter, "What is this?", system="Be brief.")
    assert built.source == CHAT_TEMPLATE
    assert built.text == "SYS: Be brief.\nUSER: <image>\nWhat is this? ASSISTANT:"
    # the processor turns it into the model's vision tokens, as many as the family's default prompt gives
    enc = templated(images=torch.zeros(3, 336, 336), text=built.text, return_tensors="pt")
    n = int(tiny.adapter.vision_mask(enc["input_ids"])[0].sum())
    assert n == tiny.adapter.vision_tokens_per_image()


def test_a_broken_template_is_one_line(tiny, templated):
    templated.chat_template = "{{ raise_exception('no images here') }}"
    with pytest.raises(UserError, match="chat template could not render"):
        build_prompt(templated, tiny.adapter, "Q?")


def test_prepared_inputs_record_the_prompt_sent(tiny, templated):
    from conftest import SAMPLE_IMAGES

    path = sorted(SAMPLE_IMAGES.glob("*.png"))[0]
    item = PromptItem(image=path, question="What is this?", answer=None, line=0)
    loaded = copy.copy(tiny)
    loaded.processor = templated
    (inp,) = prepare_inputs(loaded, [load_image_input(path)], [item], system_prompt="Be brief.")
    assert inp.prompt == "SYS: Be brief.\nUSER: <image>\nWhat is this? ASSISTANT:"
    assert inp.to_dict()["prompt"] == inp.prompt and inp.to_dict()["prompt_template"] == CHAT_TEMPLATE
    (plain,) = prepare_inputs(tiny, [load_image_input(path)], [item])
    assert plain.prompt_template == FAMILY_DEFAULT and plain.prompt == tiny.adapter.format_prompt("What is this?")
