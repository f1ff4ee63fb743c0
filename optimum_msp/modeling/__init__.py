from .loading import MODEL_ALIASES, base_model_id, load_model, load_tokenizer, resolve_model_path
