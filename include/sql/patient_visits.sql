-- One day of patient visits: the run's data interval, bound as parameters (never pasted into the SQL).
SELECT patient_id, name, birth_year, visit_date, diagnosis_code, ward
FROM patient_visits
WHERE visit_date >= :start AND visit_date < :end
