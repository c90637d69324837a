"""GDN-2 family ops: the public API (`api`), the token recurrence (`recurrent`), the chunkwise WY path (`chunk`)."""
