/* Stub: intentionally empty; bcc's virtual headers provide what is needed. */
