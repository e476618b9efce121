"""Models in and out: Hugging Face folders and GGUF files become run directories, and our models
become Hugging Face folders that transformers, PEFT, vLLM and llama.cpp's converter read.

    hf.py       config translation both ways (ours <-> Hugging Face's Llama / Mistral / Qwen2)
    gguf.py     reading a GGUF file: metadata, tokenizer, dequantised tensors
    importer.py `pocketgpt import SRC RUN`
    export.py   `pocketgpt export RUN --to hf DIR` (and the tokenizer in tiktoken's format)
"""
