-- Whether topic $1 is subscribed by default; no row when it does not exist.
SELECT default_subscribed FROM email.topics WHERE name = $1
