-- True when interval $1 is negative (purge refuses it).
SELECT $1 < interval '0'
