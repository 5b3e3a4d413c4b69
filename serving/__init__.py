"""Online serving of the champion recommender over HTTP."""
