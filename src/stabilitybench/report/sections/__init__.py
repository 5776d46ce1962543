"""One module per section of the report page; each turns ReportData into an HTML fragment."""
