"""Read the records of an offline W&B run file (`wandb/offline-run-*/run-*.wandb`) in tests.

The file is a log of protobuf `Record`s in 32 KiB blocks (the LevelDB log layout): a 7-byte file
header (":W&B", magic, version), then chunks of [crc32 (4), length (2), type (1), payload]; type 1 is
a whole record, 2 / 3 / 4 the first / middle / last piece of one. A chunk header never straddles a
block: the block's last bytes are padding when fewer than 7 remain."""
import json
import struct

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        pieces.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record
        elif kind not in (FIRST, MIDDLE):  # zero padding at the end of the file
            pieces = []


def final_summary(path) -> dict:
    """The run's summary as W&B shows it: every summary update applied in order."""
    summary = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary
