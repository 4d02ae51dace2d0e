"""The one-line usage: compile the decode step of the embedded model with backend="csd".

    python examples/compile_and_generate.py
"""

import torch

import csd_compile
from csd_compile.models.hf_generate import compile_config, encode_prompt

model, tokenizer = csd_compile.load_model("smollm2-135m-instruct", dtype="bf16")
ids = encode_prompt(tokenizer, "Give me two tips for writing clear Python.", chat=True)

with torch.inference_mode():
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=64,
        cache_implementation="static",  # fixed shapes: the decode step compiles once
        compile_config=compile_config(options={}),  # backend="csd", fullgraph=True
    )
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
