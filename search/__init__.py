"""Product search's training side: the encoders' fine-tuning tasks and the relevance evaluation
(the served engine is ``served_model.search``; the pipeline stages are ``training.search``)."""
