"""Retrieval-augmented generation: put the documents a question needs into the context window.

    index.py    chunks by tokens, BM25 + MiniLM embeddings, hybrid ranking; an on-disk index that a
                second build over unchanged documents does not redo
    answer.py   the passages prompt, and asking a model with it (answers cite chunk ids)

    pocketgpt rag index DIR --out INDEX
    pocketgpt rag ask INDEX "question" --model RUN
"""
