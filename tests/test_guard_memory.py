"""A guard call of any size runs in bounded steps: a 1 MB text delta under a fixed address-space limit.

``GuardAdapter.push_text`` of one 1,000,000-character delta, as LangChain's
``invoke`` or a tool call's arguments bring it, with the tiny guard and the
real Qwen3 tokenizer, in a subprocess whose address space may grow by only
``HEADROOM`` past what it held before the call (``RLIMIT_AS``). The text is
source-code separator lines (``//----...``), which Qwen3 encodes in few tokens
(17,112 guard tokens), so that the test stays quick: attention over every
cached position makes a call's time grow with the square of its tokens
whatever its memory, and a megabyte of prose (about 220,000 guard tokens)
takes minutes on two cores.

Before the calls ran in steps, the 17,112 tokens went through one forward
whose attention mask and scores are tokens x tokens: the process grew by
1.4 GB (measured: VmPeak 1.06 GB before the call, 2.44 GB after), and the
call fails under this limit with an out-of-memory error.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEADROOM = 512 << 20  # bytes of address space the call may add
CHILD = textwrap.dedent(
    """
    import resource, sys, tempfile

    import torch

    torch.set_num_threads(1)
    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from guard import StreamGuard
    from guard.testing import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tempfile.mkdtemp(), tokenizer_json=qwen3_tokenizer_path())
    guard = StreamGuard.from_pretrained(folder, device="cpu", dtype="float32")
    line = "//" + "-" * 114 + "\\n"
    text = (line * (1_000_000 // len(line) + 1))[:1_000_000]
    adapter = GuardAdapter(guard.session())
    adapter.moderate_prompt("Write a file header")
    with open("/proc/self/status") as status:
        size = next(int(row.split()[1]) * 1024 for row in status if row.startswith("VmSize"))
    limit = size + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    pieces = adapter.push_text(text) + adapter.finish()
    print(len(text), len(pieces), "".join(piece.text for piece in pieces) == text, adapter.session.position)
    """
)


def test_a_one_megabyte_delta_is_judged_within_a_fixed_address_space():
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(HEADROOM)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    characters, pieces, whole, position = done.stdout.split()
    assert (int(characters), int(pieces), whole) == (1_000_000, 1, "True")  # one delta, one piece, all of it
    assert int(position) > 17_000  # every guard token was judged (prompt and end of turn included)
