"""Every Python block of README.md runs, as written, so the README cannot rot.

The blocks name things a user has (their generator's tokenizer, its ids, a
model, a chat model); each runs in a fresh namespace where those are real
stand-ins: the bundled Llama 3 tokenizer, a real 2-layer Llama with the
Mistral v1 vocabulary and a chat template, langchain-core's fake chat model.
``"Qwen/Qwen3Guard-Stream-0.6B"`` resolves to a folder of that name in the
working directory, where a tiny checkpoint in the real layout lies (the
loader takes a local folder before the hub), wired to call the Qwen3 tokens of
" dynamite" Unsafe and everything else Safe.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import textwrap
import threading
from pathlib import Path

import pytest

from adapter.bundled_tokenizers import generator_tokenizer, package_file, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard.testing import write_tiny_checkpoint
from tests.test_source import encode
from tests.tiny_generator import tiny_mistral_vocabulary_llama

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = [
    (README[: match.start()].count("\n") + 2, match.group(1))
    for match in re.finditer(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
]
ANSWER = "Dig around the roots and lift it out; never use dynamite."
#: The real Llama 3 instruct template, as data on the tiny generator's tokenizer.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_the_readme_has_python_blocks_to_run():
    assert len(BLOCKS) >= 6


def test_the_readme_test_command_is_what_ci_runs():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in README


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    unsafe = encode_ordinary(qwen3_tokenizer(), " dynamite")
    checkpoint = folder / "Qwen" / "Qwen3Guard-Stream-0.6B"
    write_tiny_checkpoint(checkpoint, tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe)
    shutil.copytree(checkpoint, folder / "Qwen3Guard-Stream-0.6B")
    model = tiny_mistral_vocabulary_llama()
    tokenizer = generator_tokenizer("mistral-v1")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return folder, model, tokenizer


def namespace(folder: Path, model, tokenizer) -> dict:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from adapter import GuardAdapter
    from guard import Policy, StreamGuard

    guard = StreamGuard.from_pretrained(folder / "Qwen" / "Qwen3Guard-Stream-0.6B")
    llama3 = generator_tokenizer("llama3")
    adapter = GuardAdapter(guard.session())
    adapter.moderate_prompt("How do I remove a stump?")
    answers = [AIMessage(content=ANSWER), AIMessage(content="Dig around the roots and lift it out.")] * 4
    return {
        "guard": guard,
        "policy": Policy(),
        "session": guard.session(),
        "messages": [{"role": "user", "content": "How do I remove a stump?"}],
        "generator_tokenizer": llama3,
        "generated_ids": encode(llama3, ANSWER),
        "generator_stream": iter(encode(llama3, ANSWER)),
        "qwen_ids": encode_ordinary(qwen3_tokenizer(), "Dig around the roots and lift it out."),
        "ids": encode_ordinary(qwen3_tokenizer(), "Dig around the roots."),
        "adapter": adapter,
        "delta": "Some words ",
        "model": model,
        "tokenizer": tokenizer,
        "r1_tokenizer": generator_tokenizer("deepseek-v3"),
        "r1_distill": generator_tokenizer("deepseek-v3"),
        "chat_model": GenericFakeChatModel(messages=iter(answers)),
        "package_file": package_file,
    }


def run_block(code: str, scope: dict) -> None:
    if re.search(r"^\s*(?:[\w.]+\s*=\s*)?await ", code, flags=re.M):
        body = textwrap.indent(code, "    ")
        exec(compile(f"async def _block():\n{body}\n    return locals()\n", "README.md", "exec"), scope)
        scope.update(asyncio.run(scope["_block"]()))
    else:
        exec(compile(code, "README.md", "exec"), scope)


#: Where the README's gateway examples expect `crossguard serve`.
GATEWAY_URL = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    """A real gateway in front of the real tiny upstream, started only for the
    blocks that talk to one; they run with its address in place of
    ``GATEWAY_URL`` (that port may be taken on the machine)."""
    from guard import StreamGuard
    from integrations.gateway import GatewayConfig, create_app
    from tests.gateway_harness import AppServer, write_gateway_guard
    from tests.upstream_server import UpstreamServer

    guard = StreamGuard.from_pretrained(write_gateway_guard(tmp_path_factory.mktemp("readme-gateway")))
    with UpstreamServer() as upstream:
        config = GatewayConfig(upstream=upstream.url, generator="llama3", token_ids="request")
        with AppServer(create_app(config, guard=guard)) as server:
            yield server.url


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line-{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(world, monkeypatch, request, line, code):
    folder, model, tokenizer = world
    if GATEWAY_URL in code:
        code = code.replace(GATEWAY_URL, request.getfixturevalue("gateway_url"))
    monkeypatch.chdir(folder)
    scope = namespace(folder, model, tokenizer)
    errors: list[BaseException] = []

    def target():
        try:
            run_block(code, scope)
        except BaseException as error:  # reported below, with the README line
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), f"README.md block at line {line} hung"
    if errors:
        raise AssertionError(f"README.md block at line {line} failed: {errors[0]!r}") from errors[0]
