"""Pipeline step 5: stability of pairs and features, absorption-reduction efficiency, the headline figures."""
