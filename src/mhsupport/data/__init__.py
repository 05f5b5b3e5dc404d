"""Raw corpora to examples: the taxonomy, reading and downloading ESConv and EPITOME, leak-free
splits, one example per supporter turn or Reddit pair, and the Parquet files that hold them."""
