#!/usr/bin/env python3
# Writes the seed corpora of fuzz_safetensors and fuzz_dsml (fuzz/corpus/<target>/): a few small valid
# safetensors images (every dtype family, an empty tensor, a scalar) and DSML tool-call texts in the official
# and the tolerated variant spellings. The first byte of a fuzz_dsml input selects reasoning (odd) or not.
import json
import os
import struct

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def st(name, hdr, data):
    h = json.dumps(hdr).encode()
    with open(os.path.join(root, "fuzz_safetensors", name), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


os.makedirs(os.path.join(root, "fuzz_safetensors"), exist_ok=True)
os.makedirs(os.path.join(root, "fuzz_dsml"), exist_ok=True)
st("f32_bf16_i64", {"__metadata__": {"format": "pt"},
                    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                    "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
                    "c": {"dtype": "I64", "shape": [1], "data_offsets": [22, 30]}}, bytes(range(30)))
st("fp8_scale", {"w": {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]},
                 "w.scale": {"dtype": "F8_E8M0", "shape": [1, 1], "data_offsets": [16, 17]}}, bytes(range(17)))
st("empty_tensor", {"z": {"dtype": "F16", "shape": [0, 5], "data_offsets": [0, 0]},
                    "y": {"dtype": "I8", "shape": [], "data_offsets": [0, 1]}}, b"\x05")

D = "｜DSML｜"
seeds = {
    "call": "\x00<" + D + 'invoke name="get_weather">\n<' + D + 'parameter name="city" string="true">Rome</' + D +
            'parameter>\n<' + D + 'parameter name="days" string="false">{"a": [1, 2]}</' + D + "parameter>\n</" +
            D + "invoke>\n</" + D + "tool_calls>",
    "stream": "\x01thinking here</think>answer text\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n<' + D +
              'parameter name="x" string="true">1</' + D + "parameter>\n</" + D + "invoke>\n</" + D +
              "tool_calls><｜end▁of▁sentence｜>",
    "variants": '\x00<DSML｜invoke name=\u201cf\u201d>\n<｜｜DSML｜｜parameter name="a">x</DSML｜parameter>\n'
                '<invoke name="g"><parameter name="b" string="false">{"n": {"m": 2}}</parameter></invoke>',
}
for k, v in seeds.items():
    with open(os.path.join(root, "fuzz_dsml", k), "wb") as f:
        f.write(v.encode())
