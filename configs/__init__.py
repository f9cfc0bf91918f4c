"""`get_config(arg)` files (big_vision style), installed with evejax: `--config=configs/demo.py:arg`
on any evejax CLI finds them from any directory, and `import configs.demo` works."""
