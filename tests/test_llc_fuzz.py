"""Fuzzing llc.py's loaders with hypothesis: random bytes, truncated copies, byte-mutated copies and
copies with a mutated pickle (re-zipped so that their CRC-32s are valid again) of the shipped
`checkpoints/llc_ant.pt` and of synthetic ASE / rl_games checkpoints in both layouts.

Every load must end in one of two ways: the LLC loads and its tensors, architecture and metadata equal
the original's (the mutation hit bytes that do not matter), or LLCCheckpointError with a message that
names the file. Any other exception, a silently changed weight, or a load slower than the deadline
fails the test; a hard timer ends the run if a load hangs. (The one exception: an ASE file re-zipped
with a mutated pickle may load as another valid ASE checkpoint, since that format has no digest.)

The number of examples per strategy is small for CI (derandomized, so every run tries the same
inputs); FUZZ_EXAMPLES sets it for a larger run, and -s prints the counts:

    FUZZ_EXAMPLES=1000 python -m pytest tests/test_llc_fuzz.py -q -s
"""

import faulthandler
import io
import os
import pathlib
import sys
import zipfile
from collections import Counter
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from llc import LLCCheckpointError, load_llc  # noqa: E402
from test_llc import SMALL, ase_llc_checkpoint  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_SECONDS = 120 + 3 * EXAMPLES  # far above a test's normal time: only a hang reaches it


@pytest.fixture(autouse=True)
def no_hang():
    """Dump every thread's stack and end the run if one test takes HANG_SECONDS (a load that hangs)."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Source:
    """An original checkpoint: its bytes and what loading it gives."""

    def __init__(self, name, data, folder):
        self.name, self.data = name, data
        original = folder / f"original_{name}"
        original.write_bytes(data)
        model = load_llc(original)
        self.state, self.arch, self.metadata = model.state_dict(), model.arch, model.metadata
        self.path = folder / f"fuzzed_{name}"  # where each fuzzed copy is written

    def outcome(self, data):
        """Load `data`: 'refused' (LLCCheckpointError naming the file), 'loaded' (tensors, architecture and
        metadata equal the original's) or 'different' (it loaded as another LLC); any other exception fails."""
        self.path.write_bytes(data)
        try:
            model = load_llc(self.path)
        except LLCCheckpointError as error:
            assert str(error).startswith(f"{self.path}: "), str(error)
            return "refused"
        state = model.state_dict()
        changed = {key.split(".")[0] for key in state.keys() ^ self.state.keys()}
        changed |= {key.split(".")[0] for key, value in self.state.items() if key in state
                    and (state[key].dtype != value.dtype or not torch.equal(state[key], value))}
        changed |= {"arch"} if model.arch != self.arch else set()
        changed |= {f"metadata['{key}']" for key in model.metadata.keys() | self.metadata.keys()
                    if model.metadata.get(key) != self.metadata.get(key)}
        self.changed = sorted(changed)  # what differs, e.g. ['amp_normalizer', "metadata['epoch']"]
        return "different" if changed else "loaded"


def ase_bytes(layout):
    buffer = io.BytesIO()
    torch.save(ase_llc_checkpoint(**SMALL, layout=layout), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["native", "ase_1.1", "ase_1.3"])
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    if request.param == "native":
        return Source("llc_ant.pt", (REPO_ROOT / "checkpoints" / "llc_ant.pt").read_bytes(), folder)
    return Source(f"{request.param}.pth", ase_bytes(request.param.split("_")[1]), folder)


def report(name, source, counts):
    print(f"\n{name} of {source.name}: {sum(counts.values())} tried, {counts['loaded']} loaded unchanged, "
          f"{counts['refused']} refused with LLCCheckpointError, {counts['different']} loaded changed")


def test_random_bytes_are_refused(source):
    counts = Counter()

    @FUZZ
    @given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", source.data[:64]]),
           body=st.binary(max_size=4096))
    def check(prefix, body):
        counts[source.outcome(prefix + body)] += 1
        assert counts["refused"] == sum(counts.values())

    check()
    report("random bytes", source, counts)


def test_truncated_copies_are_refused(source):
    counts = Counter()

    @FUZZ
    @given(size=st.integers(0, len(source.data) - 1))
    def check(size):
        counts[source.outcome(source.data[:size])] += 1
        assert counts["refused"] == sum(counts.values())

    check()
    report("truncated copies", source, counts)


def mutate(data, edits):
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    return bytes(mutated)


def edits(max_size):
    return st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=max_size)


def test_byte_mutated_copies_load_unchanged_or_are_refused(source):
    counts = Counter()

    @FUZZ
    @given(changes=edits(8))
    def check(changes):
        result = source.outcome(mutate(source.data, changes))
        counts[result] += 1
        assert result != "different", f"a damaged file loaded changed: {source.changed}"

    check()
    report("byte-mutated copies", source, counts)


def rezipped_with_mutated_pickle(data, changes):
    """`data` (a torch.save zip) with bytes of its pickle changed and the archive written again, so that
    every CRC-32 is valid: what the zip's own check cannot see, the loader's checks must."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rezipped:
        for info in archive.infolist():
            member = archive.read(info)
            rezipped.writestr(info.filename, mutate(member, changes) if info.filename.endswith("data.pkl") else member)
    return out.getvalue()


def test_pickle_mutated_copies_with_valid_crcs_load_unchanged_or_are_refused(source):
    """For the native format the digest catches what the CRCs no longer do. An ASE file has no digest:
    a mutated pickle can make it a different but valid checkpoint (two storages of one size swapped),
    so there such a load is counted, not a failure; an exception other than LLCCheckpointError still is."""
    counts = Counter()
    native = source.name.endswith(".pt")

    @FUZZ
    @given(changes=edits(3))
    def check(changes):
        result = source.outcome(rezipped_with_mutated_pickle(source.data, changes))
        counts[result] += 1
        assert result != "different" or not native, f"a modified native file loaded changed: {source.changed}"
        if result == "different":
            differences[", ".join(source.changed)] += 1

    differences = Counter()
    check()
    report("pickle-mutated re-zipped copies", source, counts)
    for what, count in differences.most_common():
        print(f"    {count} loaded with other {what}")
