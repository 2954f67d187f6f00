"""Tools that read a domain from outside: doctor, inspection, top."""
