"""The canonical data schema: column names as constants, shared by every stage.

A retailer's data enters ShopML in three tables. Only the columns below are read; extra
columns are ignored. Spark, Great Expectations, Feast, training and serving all refer to
columns through these constants so a rename happens in one place.
"""

from __future__ import annotations

# --- events: one row per user interaction ------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
EVENT_TYPE = "event_type"
TIMESTAMP = "timestamp"  # UTC, timestamp type
SESSION_ID = "session_id"  # optional: a basket / order / browsing session
QUERY = "query"  # optional: the search query that led to the event
EVENT_DATE = "event_date"  # partition column derived from TIMESTAMP (yyyy-MM-dd)
# A basket is the event's session when it has one, else the user's UTC day: the one rule,
# written for pandas in mlkit.splits.basket_ids and for Spark in spark_jobs.features
# (tests/test_splits.py holds them equal).
BASKET_ID = "basket_id"

# Earliest event time accepted (cleaning and POST /events): before it is a default or epoch
# value, not a real event.
MIN_EVENT_TIME = "2000-01-01 00:00:00"
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "search")
PURCHASE = "purchase"

# Ids longer than this are refused at ingestion and by serving (one limit for both).
MAX_ID_LENGTH = 128
# Integer or float epoch timestamps need their unit declared (LandConfig.timestamp_unit).
TIMESTAMP_UNITS: tuple[str, ...] = ("s", "ms", "us", "ns")

EVENT_COLUMNS: tuple[str, ...] = (USER_ID, ITEM_ID, EVENT_TYPE, TIMESTAMP, SESSION_ID, QUERY)
EVENT_REQUIRED: tuple[str, ...] = (USER_ID, ITEM_ID, EVENT_TYPE, TIMESTAMP)

# --- items: the product catalog ----------------------------------------------------------
TITLE = "title"
CATEGORY = "category"
PRICE = "price"
TEXT = "text"  # optional long description
IMAGE = "image"  # optional image path or URI

ITEM_COLUMNS: tuple[str, ...] = (ITEM_ID, TITLE, CATEGORY, PRICE, TEXT, IMAGE)
ITEM_REQUIRED: tuple[str, ...] = (ITEM_ID,)

# --- users -------------------------------------------------------------------------------
SIGNUP_DATE = "signup_date"  # optional
USER_COLUMNS: tuple[str, ...] = (USER_ID, SIGNUP_DATE)

# --- engineered features (Spark output, Feast input) ---------------------------------------
FEATURE_TIMESTAMP = "feature_timestamp"  # when a feature row becomes valid (Feast event ts)

USER_N_EVENTS = "user_n_events"
USER_N_PURCHASES = "user_n_purchases"
USER_N_BASKETS = "user_n_baskets"
USER_N_DISTINCT_ITEMS = "user_n_distinct_items"
USER_REORDER_RATE = "user_reorder_rate"
USER_AVG_BASKET_SIZE = "user_avg_basket_size"
USER_DAYS_SINCE_PRIOR = "user_days_since_prior"
USER_FEATURES: tuple[str, ...] = (
    USER_N_EVENTS,
    USER_N_PURCHASES,
    USER_N_BASKETS,
    USER_N_DISTINCT_ITEMS,
    USER_REORDER_RATE,
    USER_AVG_BASKET_SIZE,
    USER_DAYS_SINCE_PRIOR,
)

ITEM_N_EVENTS = "item_n_events"
ITEM_N_PURCHASES = "item_n_purchases"
ITEM_N_USERS = "item_n_users"
ITEM_REORDER_RATE = "item_reorder_rate"
ITEM_PURCHASES_30D = "item_purchases_30d"
ITEM_FEATURES: tuple[str, ...] = (
    ITEM_N_EVENTS,
    ITEM_N_PURCHASES,
    ITEM_N_USERS,
    ITEM_REORDER_RATE,
    ITEM_PURCHASES_30D,
)

# --- session features (spark_jobs.streaming -> Feast push source -> serving) ----------------
SESSION_ITEMS = "session_items"  # the session's distinct items so far, the latest last
SESSION_LENGTH = "session_length"  # events in the session so far
SESSION_LAST_CATEGORY = "session_last_category"  # the category of its latest item
SESSION_LAST_EVENT_MS = "session_last_event_ms"  # epoch ms of its latest event
SESSION_FEATURES: tuple[str, ...] = (
    SESSION_ID,
    SESSION_ITEMS,
    SESSION_LENGTH,
    SESSION_LAST_CATEGORY,
    SESSION_LAST_EVENT_MS,
)

# --- training sets ---------------------------------------------------------------------------
ENTITY_TIMESTAMP = "event_timestamp"  # Feast's entity-row time column (point-in-time joins)
LABEL = "label"  # a training row's target

# --- quarantine ---------------------------------------------------------------------------
REJECT_REASON = "reject_reason"

# --- search (spark_jobs/search_data.py) ------------------------------------------------------
SEARCH_SPLITS: tuple[str, ...] = ("train", "validation", "test")
# product-overlapping (the product has training queries) / product-disjoint (it has none)
SEARCH_VIEWS: tuple[str, ...] = ("overlapping", "disjoint")
SEARCH_PAIR_KINDS: tuple[str, ...] = ("positive", "same_class", "random", "hard_negative")
SEARCH_GRADES: tuple[int, ...] = (0, 1, 2)  # other class, same class, the reviewed product
