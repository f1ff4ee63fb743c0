from .loading import MODEL_ALIASES, load_model, load_tokenizer, resolve_model_path
