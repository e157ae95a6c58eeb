"""verl glue: everything in ssopd_verl that imports verl lives in this subpackage."""
