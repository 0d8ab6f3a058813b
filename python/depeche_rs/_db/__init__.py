"""The database underneath: connections and DSNs, the tables' DDL, migrations from depeche-db."""
