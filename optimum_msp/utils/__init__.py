from .paths import cache_dir, local_data_dir

__all__ = ["cache_dir", "local_data_dir"]
