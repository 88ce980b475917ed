"""The offline demo upstream (``crossguard serve --demo-upstream``), driven by
the real ``openai`` SDK: it answers from its script, and its real tiny Llama 3
generates every token it sends."""

from __future__ import annotations

import openai
import pytest

from integrations.demo_upstream import (
    DEMO_OTHER_ANSWER,
    DEMO_STUMP_ANSWER,
    EOT,
    MODEL_NAME,
    UpstreamServer,
    demo_answer,
    llama3_tokenizer,
)


@pytest.fixture(scope="module")
def demo():
    with UpstreamServer(answers=demo_answer) as server:
        yield server
    assert not server.errors


@pytest.fixture
def client(demo):
    with openai.OpenAI(base_url=demo.url, api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_the_sdk_sees_one_model_named_tiny_llama3(client):
    assert MODEL_NAME == "tiny-llama3"
    assert [model.id for model in client.models.list()] == ["tiny-llama3"]


def test_a_stump_question_streams_the_answer_the_demo_guard_cuts(demo, client):
    demo.reset()
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ask("How do I remove a stump?"), stream=True)
    chunks = list(stream)
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == DEMO_STUMP_ANSWER and " dynamite" in text
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason] == ["stop"]
    (completion,) = demo.completions
    # Every token came out of the model's own forward, one per step, then the end of turn.
    assert completion["choices"][0]["ids"] == [*llama3_tokenizer().encode(text, add_special_tokens=False).ids, EOT]


def test_any_other_question_gets_an_answer_that_says_what_the_server_is(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ask("Say hello."))
    assert whole.choices[0].message.content == DEMO_OTHER_ANSWER and whole.model == MODEL_NAME
    answer_ids = llama3_tokenizer().encode(DEMO_OTHER_ANSWER, add_special_tokens=False).ids
    assert whole.usage.completion_tokens == len(answer_ids) + 1  # and the end of turn


def test_a_request_that_brings_its_own_script_gets_it(client):
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=ask("How do I remove a stump?"), extra_body={"test_script": "Call an arborist."}
    )
    assert whole.choices[0].message.content == "Call an arborist."
