"""What `--base` names: resolving aliases and folders, model files, the offline tokenizer."""
