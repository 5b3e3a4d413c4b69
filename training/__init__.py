"""Training, compression, evaluation and registration of ShopML's recommenders."""
